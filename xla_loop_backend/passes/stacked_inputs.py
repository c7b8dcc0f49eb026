"""Before AOTAutograd, last: in inference, a stack of graph inputs becomes an input of its
own, which the call stacks once and keeps while the stacked tensors stay the same
(`call.StackedOnce`).

Why: a model's repeated layers run as one scan over their weights stacked along a new first
dimension (`scan_layers`, or the `roll_layers` pass). Stacked inside the graph, the weights
are copied into the stack on every call; as an input, the stack is made once, and a call
copies no weights.

Which stacks: `torch.stack(inputs)` along dim 0 in the top-level graph, of at least two
distinct graph inputs that the graph does not update in place; in inference only (the call
keeps the stacks while the weights do not change: no copy a call), and not under SPMD,
where a stack made outside the graph would need a layout of its own.

In training the stacks stay in the graph. Made outside it (with autograd, each call), they
cut AOTAutograd's time at 32 decoder layers by 0.9 s, but the split of each stack's gradient
then compiled with the optimizer's update, and the first two steps together took as long
as before (measured; reverted).

Always, first: Dynamo's graph deduplication (on under xla_loop_backend.compile) makes two
stacks of one shape (scan_layers' stacks of a layer's gate and up weights) calls of one
subgraph that only stacks; those calls are copied back in line, where this pass finds them,
and AOTAutograd does not trace a joint graph for each (0.8 s at 32 decoder layers).
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from .. import stacking  # noqa: F401  (registers torch.ops.xla_loop.stack_layers)
from ..options import PassContext
from ..sharding import spmd_on
from ..traversal import GraphPass, free_name, unchanged


def hoist_stacks(gm: torch.fx.GraphModule, context: PassContext) -> None:
    """The pass's step on the whole graph (see the module docstring)."""
    _inline_stacking_subgraphs(gm)
    if context.training or spmd_on():
        return
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for node in [n for target in STACKS for n in gm.graph.find_nodes(op="call_function", target=target)]:
        items = _stacked_inputs(node, placeholders)
        if items is None:
            continue
        last = list(gm.graph.find_nodes(op="placeholder"))[-1]
        with gm.graph.inserting_after(last):
            stacked = gm.graph.placeholder(free_name(gm, "stacked_inputs"))
        stacked._dynamo_source = None  # (AOTAutograd asks each input of a Dynamo graph for its source)
        stacked.meta = {key: node.meta[key] for key in ("example_value", "val") if key in node.meta}
        node.replace_all_uses_with(stacked)
        gm.graph.erase_node(node)
        context.stacked_inputs.append(tuple(placeholders.index(item) for item in items))


def _inline_stacking_subgraphs(gm: torch.fx.GraphModule) -> None:
    """Calls of a subgraph that only stacks its inputs (and moves dim 0 to 0), which Dynamo's
    graph deduplication made, copied back in line (see the module docstring)."""
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph)):
        sub = getattr(gm, node.args[0].target, None) if node.args[0].op == "get_attr" else None
        if not isinstance(sub, torch.fx.GraphModule) or not all(
            n.op in ("placeholder", "output") or (n.op == "call_function" and n.target in _STACKING) for n in sub.graph.nodes
        ):
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            continue
        inner = list(sub.graph.find_nodes(op="placeholder"))
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(sub.graph, dict(zip(inner, node.args[2:])))
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)


STACKS = (torch.stack, torch.ops.xla_loop.stack_layers.default)  # (stacking.py: the layers' weights)
_STACKING = (*STACKS, torch.movedim)


def _stacked_inputs(node: torch.fx.Node, placeholders: list[torch.fx.Node]) -> list[torch.fx.Node] | None:
    """The inputs `node` stacks along dim 0, if it is such a stack."""
    items = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)  # (stack_layers: always 0)
    if dim != 0 or not isinstance(items, (list, tuple)) or len(items) < 2:
        return None
    if not all(isinstance(i, torch.fx.Node) and i in placeholders for i in items) or len(set(items)) != len(items):
        return None
    if any(_updates(user) for item in items for user in item.users):
        return None  # (stacked once before the graph, the stack would miss the update)
    return list(items)


def _updates(node: torch.fx.Node) -> bool:
    """Whether `node` may update its operands in place (`x.add_(1)`, `x[i] = v`, `out=`)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    in_place = isinstance(name, str) and name.endswith("_") and not name.endswith("__")
    return in_place or node.target is operator.setitem or "out" in node.kwargs


PASS = GraphPass(
    "stacked_inputs",
    "makes stacks of the graph's inputs inputs of their own",
    {kind: unchanged for kind in ("while_loop", "scan", "map", "cond", "invoke_subgraph")},
    finish=hoist_stacks,
)
