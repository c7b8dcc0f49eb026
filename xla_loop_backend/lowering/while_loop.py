"""Lowering rule: `torch.ops.higher_order.while_loop` -> one XLA `While`.

The While's state is (carries, additional inputs, then what cond and body captured; see
`state`). cond and body become XLA computations called from the While's condition
and body; the body passes everything but the carries through unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch_xla.core.xla_builder as xb

from .. import metrics
from ..errors import LoopLoweringError, describe_value, loop_name
from .sharding import shardings_of
from .subgraph import StagedComputation, SubgraphInterpreter, scalar_to_tensor, stage_computation
from .state import ControlFlowState, as_state_tensor, check_new_carries


def lower_while_loop(
    node: torch.fx.Node | None,
    cond_fn: torch.fx.GraphModule,
    body_fn: torch.fx.GraphModule,
    carried_inputs: Sequence[Any],
    additional_inputs: Sequence[Any],
) -> tuple[Any, ...]:
    """Run a while_loop as one XLA While on lazy XLA tensors.

    Python int carries travel as 0-dim int64 tensors and come back as such; the caller
    (graph rewrite) turns results the graph expects as ints back into ints.
    """
    name = loop_name("while_loop", node)
    metrics.increment(metrics.LOOPS_LOWERED)
    carries = [as_state_tensor(name, i, c) for i, c in enumerate(carried_inputs)]
    extras = [as_state_tensor(name, i, a, what="additional input") for i, a in enumerate(additional_inputs)]
    num_carries = len(carries)

    def run_cond(args: list[torch.Tensor]) -> list[torch.Tensor]:
        pred = SubgraphInterpreter(cond_fn, name).run(*args)
        return [_check_predicate(name, pred)]

    def run_body(args: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = SubgraphInterpreter(body_fn, name).run(*args)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        return check_new_carries(name, "body", outputs, carries)

    inputs = carries + extras
    cond = stage_computation("while_cond", run_cond, inputs)
    body = stage_computation("while_body", run_body, inputs, carry_shardings=shardings_of(carries))
    final = tuple(_build_while(cond, body, inputs, num_carries))
    from . import report_lowered

    report_lowered(name, "while_loop", "one XLA While", "data-dependent (read on the device)", carries)
    return final


def _build_while(
    cond: StagedComputation, body: StagedComputation, inputs: list[torch.Tensor], num_carries: int
) -> list[torch.Tensor]:
    state = ControlFlowState()
    state.add(inputs[:num_carries])
    state.add(inputs[num_carries:], invariant=True)
    cond_call = state.attach(cond)
    body_call = state.attach(body)
    num_inputs = len(inputs)

    def cond_fn(values: list[xb.Op]) -> xb.Op:
        return cond_call.call(values, values[:num_inputs]).get_tuple_element(0)

    def body_fn(values: list[xb.Op]) -> list[xb.Op]:
        result = body_call.call(values, values[:num_inputs])
        return [result.get_tuple_element(i) for i in range(num_carries)] + values[num_carries:]

    return state.build("while_loop", cond_fn, body_fn)[:num_carries]


def _check_predicate(loop: str, pred: Any) -> torch.Tensor:
    if isinstance(pred, bool):
        return scalar_to_tensor(pred, torch.bool)
    if not isinstance(pred, torch.Tensor) or pred.dim() != 0 or pred.dtype != torch.bool:
        raise LoopLoweringError(
            f"{loop}: cond must return a scalar bool tensor (bool[]), found {describe_value(pred)}"
        )
    return pred
