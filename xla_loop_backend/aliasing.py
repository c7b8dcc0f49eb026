"""Loop operands that are the same tensor, made distinct before AOTAutograd.

A body that reads a carry through its closure (``fori_loop(0, 2, lambda j, u: f(c), c)``)
gets that tensor twice: as a carry and as a captured input. torch's loop ops then refuse
the graph ("scan might be aliasing the input or the output!") although the program is
fine. Each repeated operand is replaced by a copy, which XLA elides.
"""
from __future__ import annotations

import torch
import torch.fx

# Where each loop op keeps its tensor operands: positions of args that are sequences.
_OPERAND_LISTS = {
    torch.ops.higher_order.while_loop: (2, 3),  # carries, additional inputs
    torch.ops.higher_order.scan: (1, 2, 3),  # init, xs, additional inputs
    torch.ops.higher_order.map_impl: (1, 2),  # xs, additional inputs
}


def unalias_loop_operands(gm: torch.fx.GraphModule) -> None:
    """Give every loop node of `gm` and of its subgraphs distinct tensor operands (in place)."""
    for module in list(gm.modules()):
        if isinstance(module, torch.fx.GraphModule) and _unalias(module.graph):
            module.recompile()


def _unalias(graph: torch.fx.Graph) -> bool:
    changed = False
    for node in list(graph.nodes):
        positions = _OPERAND_LISTS.get(node.target) if node.op == "call_function" else None
        if not positions:
            continue
        seen: set[torch.fx.Node] = set()
        args = list(node.args)
        for position in positions:
            operands = list(args[position])
            for k, operand in enumerate(operands):
                if not isinstance(operand, torch.fx.Node) or not isinstance(_value(operand), torch.Tensor):
                    continue
                if operand in seen:
                    with graph.inserting_before(node):
                        copy = graph.call_function(torch.clone, (operand,))
                    copy.meta = {k: v for k, v in operand.meta.items() if k in ("example_value", "val", "stack_trace")}
                    operands[k] = copy
                    changed = True
                seen.add(operand)
            args[position] = type(args[position])(operands)
        node.args = tuple(args)
    return changed


def _value(node: torch.fx.Node) -> object:
    return node.meta.get("example_value", node.meta.get("val"))
