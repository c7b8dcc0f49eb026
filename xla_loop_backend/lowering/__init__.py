"""Lowering rules: one function per loop primitive, registered in one table.

A rule takes the FX node (for error messages; None when called directly), then the
primitive's own arguments with lazy XLA tensors for tensors and GraphModules for subgraphs,
and returns the primitive's outputs as lazy XLA tensors built around one XLA While.
Nested loops inside a subgraph reach the same table through `SubgraphInterpreter`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .scan import lower_map, lower_scan
from .while_loop import lower_while_loop

LoweringRule = Callable[..., Any]

LOWERING_RULES: dict[Any, LoweringRule] = {
    torch.ops.higher_order.while_loop: lower_while_loop,
    torch.ops.higher_order.scan: lower_scan,
    torch.ops.higher_order.map_impl: lower_map,
}

__all__ = ["LOWERING_RULES", "LoweringRule"]
