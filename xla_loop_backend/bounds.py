"""`max_iterations` for while_loops that are not trained through: a runaway loop stops after
`max_iterations` iterations and the call raises, instead of running forever on the device.

Each such while_loop gets an iteration counter k in its carries:

    while cond(carries) and k < max_iterations:
        carries, k = body(carries), k + 1
    ran_out = k == max_iterations and cond(carries)

A loop that finishes within the bound runs exactly as before. while_loops in the body of a
bounded while_loop or of a scan are bounded too, and report running out through a flag
carried by the enclosing loop. (Loops inside a cond, or inside a `map` body, are not.)

The graph returns one more output, whether some loop ran out; the backend reads it once
per call (one host sync per call, none per iteration) and raises `LoopLoweringError`.
Loops trained through are bounded differently (`training`), but report the same way.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch._higher_order_ops.scan import scan_op
from torch._higher_order_ops.while_loop import while_loop_op

from .errors import LoopLoweringError, loop_name

_WHILE = torch.ops.higher_order.while_loop
_SCAN = torch.ops.higher_order.scan

Flag = tuple[str, torch.fx.Node]  # (loop name, node of its bool "ran out" result)


@dataclass
class BoundedGraph:
    """The rewritten graph, and the loops whose "ran out" flag it returns last (if any)."""

    module: torch.fx.GraphModule
    loops: list[str] = field(default_factory=list)


def bound_while_loops(gm: torch.fx.GraphModule, max_iterations: int) -> list[Flag]:
    """Bound, in place, the while_loops of `gm` (and those nested in loop bodies)."""
    flags: list[Flag] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _WHILE:
            flags.append(_bound_while(gm, node, max_iterations))
        elif node.target is _SCAN:
            inner = _bound_scan_body(gm, node, max_iterations)
            if inner is not None:
                flags.append(inner)
    return flags


def _bound_while(gm: torch.fx.GraphModule, node: torch.fx.Node, max_iterations: int) -> Flag:
    cond_node, body_node, carries, extras = node.args
    cond_gm, body_gm = getattr(gm, cond_node.target), getattr(gm, body_node.target)
    name = loop_name("while_loop", node)
    inner = _bound_in_body(body_gm, max_iterations)
    run = _counted_while(cond_gm, body_gm, len(carries), max_iterations, reports=inner is not None)
    run.__name__ = f"xla_loop_counted_{node.name}"
    return _replace_with(gm, node, run, (*carries, *extras), len(carries), [cond_node, body_node], name, inner)


def _bound_scan_body(gm: torch.fx.GraphModule, node: torch.fx.Node, max_iterations: int) -> Flag | None:
    combine_node, init, xs, extras = node.args
    inner = _bound_in_body(getattr(gm, combine_node.target), max_iterations)
    if inner is None:
        return None
    combine = getattr(gm, combine_node.target)
    num_init, num_xs = len(init), len(xs)

    def run(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        init, rest = args[:num_init], args[num_init:]
        xs, extras = rest[:num_xs], rest[num_xs:]

        # The flag is a float 0/1 carry (torch 2.9's scan autograd asserts on bool carries),
        # linked to an input that requires grad if there is one (see `requiring_grad`).
        def step(ran_out: torch.Tensor, *args: torch.Tensor) -> list[torch.Tensor]:
            *out, inner_ran_out = combine(*args)
            return [torch.maximum(ran_out, inner_ran_out.to(ran_out.dtype)), *out]

        ran_out = torch.zeros((), dtype=torch.float32, device=(init or xs)[0].device)
        reference = next((a for a in args if a.requires_grad and a.is_floating_point()), None)
        if reference is not None:
            ran_out = requiring_grad(ran_out, reference)
        ran_out, *out = scan_op(step, [ran_out, *init], list(xs), tuple(extras))
        return (*out, ran_out > 0)

    run.__name__ = f"xla_loop_flagged_{node.name}"
    num_outputs = len(node.meta["example_value"])
    return _replace_with(gm, node, run, (*init, *xs, *extras), num_outputs, [combine_node], inner, None)


def _bound_in_body(body_gm: torch.fx.GraphModule, max_iterations: int) -> str | None:
    """Bound the loops in a loop body; if there are any, the body returns their flag last
    and this returns their names."""
    flags = bound_while_loops(body_gm, max_iterations)
    if not flags:
        return None
    return_flag(body_gm, [flag for _, flag in flags])
    body_gm.graph.lint()
    body_gm.recompile()
    return " or ".join(name for name, _ in flags)


def _replace_with(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    run: Callable[..., Any],
    args: tuple,
    flag_index: int,
    subgraphs: Sequence[torch.fx.Node],
    name: str,
    inner: str | None,
) -> Flag:
    """Replace the loop node by `run(*args)`, whose outputs are the node's, then the flag."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(run, args)
        flag = gm.graph.call_function(operator.getitem, (new, flag_index))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for sub in subgraphs:
        if not sub.users:
            gm.graph.erase_node(sub)
    return (name if inner is None else f"{name} (or a while_loop inside it: {inner})"), flag


def _counted_while(
    cond_gm: Callable[..., Any], body_gm: Callable[..., Any], num_carries: int, max_iterations: int, reports: bool
) -> Callable[..., tuple[Any, ...]]:
    """The while_loop with an iteration counter (see above): returns (*carries, ran_out)."""

    def run(*args: Any) -> tuple[Any, ...]:
        carries, extras = args[:num_carries], args[num_carries:]
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        count = torch.zeros((), dtype=torch.int64, device=device)
        state = (count, _false(count)) if reports else (count,)
        skip = len(state)

        def cond(*args: Any) -> torch.Tensor:
            return (args[0] < max_iterations) & scalar_bool(cond_gm(*args[skip:]))

        def body(*args: Any) -> tuple[Any, ...]:
            out = list(_as_tuple(body_gm(*args[skip:])))
            if reports:
                inner_ran_out = out.pop()
                return (args[0] + 1, args[1] | inner_ran_out, *out)
            return (args[0] + 1, *out)

        result = while_loop_op(cond, body, (*state, *carries), tuple(extras))
        count, final = result[0], result[skip:]
        ran_out = (count >= max_iterations) & scalar_bool(cond_gm(*final, *extras))
        if reports:
            ran_out = ran_out | result[1]
        return (*final, ran_out)

    return run


def requiring_grad(carry: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`carry`, linked to `reference` with an exactly zero gradient so it requires grad."""
    never = torch.zeros((), dtype=torch.bool, device=carry.device)
    return torch.where(never, reference.flatten()[0].to(carry.dtype), carry)


def _false(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.bool, device=like.device)


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def scalar_bool(pred: Any) -> torch.Tensor:
    """A cond's result as a bool tensor (a traced cond may return a Python bool)."""
    return pred if isinstance(pred, torch.Tensor) else torch.tensor(bool(pred))


def return_flag(gm: torch.fx.GraphModule, flags: Sequence[torch.fx.Node]) -> None:
    """Make `gm` return one more output: the OR of `flags`."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        flag = flags[0]
        for other in flags[1:]:
            flag = gm.graph.call_function(operator.or_, (flag, other))
    outs = output.args[0]
    output.args = ((*outs, flag),) if isinstance(outs, (tuple, list)) else ((outs, flag),)


def returning_flags(gm: torch.fx.GraphModule, flags: list[Flag]) -> BoundedGraph:
    """The graph, returning whether any bounded loop ran out as its last output."""
    if flags:
        return_flag(gm, [flag for _, flag in flags])
    gm.graph.lint()
    gm.recompile()
    return BoundedGraph(gm, [name for name, _ in flags])


def check_bounds(loops: list[str], max_iterations: int, ran_out: torch.Tensor) -> None:
    """Raise if a bounded while_loop was still going after `max_iterations` iterations."""
    if bool(ran_out.item()):
        raise LoopLoweringError(
            f"{' or '.join(loops)}: still running after max_iterations={max_iterations} "
            "iterations; its results (and gradients) would be wrong. Raise max_iterations, or "
            "check the loop's condition."
        )
