"""Lowering rules: one function per control-flow op kind (`ops.py`), in one table.

A rule takes the FX node (for error messages; None when called directly), then the op's
fields by name (`ops.OpSpec.bind`), with lazy XLA tensors for tensors and GraphModules for
subgraphs, and returns the op's outputs as lazy XLA tensors built around one XLA While (loops) or
Conditional (cond), or computed in line (invoke_subgraph).
Nested loops inside a subgraph reach the same table through `SubgraphInterpreter`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from ..errors import LoopLoweringError, loop_name
from ..explain import depth, describe_tensor, record
from ..ops import spec_of
from .cond import lower_cond
from .invoke_subgraph import lower_invoke_subgraph
from .scan import lower_map, lower_scan
from .while_loop import lower_while_loop

LoweringRule = Callable[..., Any]

_LOG = logging.getLogger(__name__)


def report_lowered(name: str, kind: str, lowered_to: str, trip: str, carries: Sequence[Any]) -> None:
    """One line per loop or branch lowered (TORCH_LOGS="xla_loop_backend"; `explain`)."""
    described = [describe_tensor(c) for c in carries]
    where = name.split(" at ", 1)[1] if " at " in name else name
    record(
        _LOG, "lowered", f"{name}: lowered to {lowered_to}" + (f"; trip count {trip}" if trip else "") + f"; carries {', '.join(described) or 'none'}",
        stacklevel=2, kind=kind, where=where, name=name, depth=depth.get(), lowered_to=lowered_to, trip=trip, carries=described,
    )


LOWERING_RULES: dict[str, LoweringRule] = {
    "while_loop": lower_while_loop,
    "scan": lower_scan,
    "map": lower_map,
    "cond": lower_cond,
    "invoke_subgraph": lower_invoke_subgraph,
}



def lower_control_flow(node: torch.fx.Node | None, target: Any, args: tuple, kwargs: dict) -> Any:
    """Lower one control-flow call through its rule. A control-flow op with no rule is an
    error: its own (dense) implementation must never run inside a lowered graph, as it reads
    its predicate or trip count back to the host, which placeholder tensors cannot do."""
    spec = spec_of(target)
    assert spec is not None and not kwargs, target
    return rule_for(node, target)(node, **spec.bind(args))


def rule_for(node: torch.fx.Node | None, target: Any) -> LoweringRule:
    """The lowering rule of a control-flow op, or a LoopLoweringError naming the loop."""
    spec = spec_of(target)
    rule = LOWERING_RULES.get(spec.kind)
    if rule is None:
        raise LoopLoweringError(
            f"{loop_name(spec.kind, node)}: xla_loop has no lowering for `torch.ops.higher_order."
            f"{getattr(target, '__name__', spec.kind)}`, so it cannot run inside the compiled graph"
            + (f": {spec.unsupported}" if spec.unsupported else "")
        )
    return rule


__all__ = ["LOWERING_RULES", "LoweringRule", "lower_control_flow", "report_lowered", "rule_for"]
