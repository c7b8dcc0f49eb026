"""Lowering rule: `torch.ops.higher_order.invoke_subgraph` -> its subgraph, inline.

Dynamo makes this op for a function marked with `torch.compiler.nested_compile_region`
(and for repeated code under its graph deduplication): one subgraph, traced once, called
where the function was. torch_xla's bridge cannot take it (the subgraph is a module
argument, not a tensor). Here each call runs the subgraph on its operands, on the lazy XLA
tensors of the enclosing graph, at every depth (loops inside it lowered through the rule
table): the executable computes what the unmarked code computes. Rolling a chain of such
calls into one loop, so the subgraph is compiled once, is a pass of its own.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import loop_name
from .subgraph import SubgraphInterpreter


def lower_invoke_subgraph(
    node: torch.fx.Node | None, subgraph: torch.fx.GraphModule, identifier: Any, operands: Sequence[Any]
) -> tuple[Any, ...]:
    """The subgraph's outputs, computed in line on the operands."""
    outputs = SubgraphInterpreter(subgraph, loop_name("invoke_subgraph", node)).run(*operands)
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
