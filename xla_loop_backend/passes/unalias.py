"""Before AOTAutograd: operands of one loop that are the same tensor, made distinct.

A body that reads a carry through its closure (``fori_loop(0, 2, lambda j, u: f(c), c)``)
gets that tensor twice: as a carry and as a captured input. torch's loop ops then refuse
the graph when AOTAutograd traces it ("scan might be aliasing the input or the output!")
although the program is fine. Each repeated tensor operand, at any depth, is replaced by a
copy, which XLA elides.
"""
from __future__ import annotations

import torch
import torch.fx

from ..ops import example_value
from ..traversal import GraphPass, Site


def distinct_operands(site: Site, context: object) -> None:
    call = site.call
    seen: set[torch.fx.Node] = set()
    updates: dict[str, list] = {}
    for field, index, operand in list(call.all_operands()):
        if not isinstance(operand, torch.fx.Node) or not isinstance(example_value(operand), torch.Tensor):
            continue
        if operand in seen:
            graph = call.owner.graph
            with graph.inserting_before(call.node):
                copy = graph.call_function(torch.clone, (operand,))
            copy.meta = {k: v for k, v in operand.meta.items() if k in ("example_value", "val", "stack_trace")}
            updates.setdefault(field, list(call[field]))[index] = copy
        seen.add(operand)
    if updates:
        call.update(**updates)


# Every op whose subgraphs receive operands can be refused for aliased ones.
PASS = GraphPass(
    "unalias",
    "gives a loop distinct operands",
    {kind: distinct_operands for kind in ("while_loop", "scan", "map", "cond", "invoke_subgraph")},
)
