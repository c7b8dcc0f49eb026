"""After AOTAutograd: results that are slices of one stack (the gradients of a layer's
weights) are split from it by `stacking.unstack_layers`, at offsets the program takes as
inputs, so XLA compiles one kernel for all of them.

Why: a model's repeated layers run as one scan over their weights stacked along a new first
dimension (`scan_layers`, the `roll_layers` pass). The backward's scan makes the gradient of
each stack at once; the gradient of each layer's weight is `select(stack, 0, i)`, a result
of the program of its own. XLA's CPU backend compiles each fused computation of a program
as a kernel, and one kernel for identical ones; a slice at a constant offset differs from
every other, so at 32 decoder layers (7 weights a layer) the backward had 225 slice kernels,
2 s of its 4 s of XLA compile. Sliced at an offset the program reads from an input (a
dynamic slice), the slices of one stack are one computation, and one kernel.
`scan_layers` and `roll_layers` stack with `stacking.stack_layers`, whose backward splits
this way already; this pass does it for other stacks (a user's `torch.stack` of weights
scanned with `scan`).

Each layer's gradient stays a buffer of its own, as before: the optimizer, gradient clipping
and `.grad` see the same tensors. (Returning the stack and slicing it lazily in the call cut
the backward's kernels too, but then the optimizer's update of each weight read its slice:
as many distinct kernels there, compiled at the first step and again at the second.)

Which results: `select(x, 0, i)` of a tensor `x` the graph computes, at least two of one `x`,
static shapes, on the XLA device. (XLA drops the parts no result uses.)
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from .. import stacking  # noqa: F401  (registers torch.ops.xla_loop.unstack_layers)
from ..traversal import NodeRewrite


def _unstacked_results(graph: torch.fx.Graph) -> bool:
    output = next(n for n in graph.nodes if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    groups: dict[torch.fx.Node, list[tuple[torch.fx.Node, int]]] = {}
    for out in dict.fromkeys(outs):
        index = _selected(out)
        if index is not None:
            groups.setdefault(out.args[0], []).append((out, index))
    changed = False
    for stack, selects in groups.items():
        if len(selects) < 2:
            continue
        with graph.inserting_after(stack):
            parts = graph.call_function(torch.ops.xla_loop.unstack_layers.default, (stack,))
        parts.meta["val"] = list(stack.meta["val"].unbind(0))
        for select, index in selects:
            with graph.inserting_before(select):
                part = graph.call_function(operator.getitem, (parts, index))
            part.meta = dict(select.meta)
            select.replace_all_uses_with(part)
            graph.erase_node(select)
        changed = True
    return changed


def _selected(node: object) -> int | None:
    """`i` when `node` is `select(x, 0, i)` of a computed XLA tensor `x` of static shape."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.select.int):
        return None
    stack, dim, index = node.args
    value = stack.meta.get("val") if isinstance(stack, torch.fx.Node) else None
    if stack.op == "placeholder" or not isinstance(value, torch.Tensor) or value.device.type != "xla":
        return None
    if not isinstance(index, int) or dim not in (0, -value.dim()) or not all(isinstance(n, int) for n in value.shape):
        return None
    return index % value.shape[0]


PASS = NodeRewrite(
    "stacked_results",
    "splits results that are selects of one stack in one op (one XLA kernel for them)",
    (_unstacked_results,),
    subgraphs=False,
)
