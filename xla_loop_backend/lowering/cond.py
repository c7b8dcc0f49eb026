"""Lowering rule: `torch.ops.higher_order.cond` -> one XLA `Conditional`.

Both branches are staged as XLA computations on the cond's operands (each interpreted
once on placeholder tensors, loops inside them lowered through the rule table); what a
branch captured becomes one more operand. The predicate stays on the device: nothing is
read back, and a call that takes the other branch runs the same executable. torch's own
implementation of cond reads the predicate back to the host, which inside a staged loop
body (placeholder tensors) aborts the process: it never runs here.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch_xla.core.xla_builder as xb

from .. import metrics
from ..errors import LoopLoweringError, describe_value, loop_name
from .state import ControlFlowState, as_state_tensor
from .subgraph import SubgraphInterpreter, scalar_to_tensor, stage_computation


def lower_cond(
    node: torch.fx.Node | None,
    pred: Any,
    true_fn: torch.fx.GraphModule,
    false_fn: torch.fx.GraphModule,
    operands: Sequence[Any],
) -> tuple[torch.Tensor, ...]:
    """Run a cond as one XLA Conditional on lazy XLA tensors: returns the branch's outputs."""
    name = loop_name("cond", node)
    metrics.increment(metrics.LOOPS_LOWERED)
    pred = _predicate(name, pred)
    inputs = [as_state_tensor(name, i, x, what="operand") for i, x in enumerate(operands)]

    def branch(fn: torch.fx.GraphModule):
        def run(args: list[torch.Tensor]) -> list[torch.Tensor]:
            outputs = SubgraphInterpreter(fn, name).run(*args)
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            return [o if isinstance(o, torch.Tensor) else scalar_to_tensor(o) for o in outputs]

        return run

    true_branch = stage_computation("cond_true", branch(true_fn), inputs)
    false_branch = stage_computation("cond_false", branch(false_fn), inputs)
    _check_same_outputs(name, true_branch.outputs, false_branch.outputs)

    state = ControlFlowState()
    state.add(inputs)
    calls = [state.attach(true_branch), state.attach(false_branch)]
    num_inputs = len(inputs)
    num_outputs = len(true_branch.outputs)

    def taking(call):
        def run(values: list[xb.Op]) -> list[xb.Op]:
            result = call.call(values, values[:num_inputs])
            return [result.get_tuple_element(i) for i in range(num_outputs)]

        return run

    outputs = tuple(state.build_conditional("cond", pred, taking(calls[0]), taking(calls[1])))
    from . import report_lowered

    report_lowered(name, "cond", "one XLA Conditional (the predicate stays on the device)", "", inputs)
    return outputs


def _predicate(name: str, pred: Any) -> torch.Tensor:
    """cond's predicate as a bool[] device tensor: a one-element tensor of any dtype (its
    value is nonzero), or a Python/symbolic bool (a device scalar here)."""
    if not isinstance(pred, torch.Tensor):
        return scalar_to_tensor(pred, torch.bool)
    if pred.numel() != 1:
        raise LoopLoweringError(f"{name}: pred must be a bool or a tensor with one element, found {describe_value(pred)}")
    pred = pred.reshape(())
    return pred if pred.dtype == torch.bool else pred != 0


def _check_same_outputs(name: str, true_outputs: list[torch.Tensor], false_outputs: list[torch.Tensor]) -> None:
    if len(true_outputs) != len(false_outputs):
        raise LoopLoweringError(
            f"{name}: both branches must return as many values: true_fn returns {len(true_outputs)}, "
            f"false_fn {len(false_outputs)}"
        )
    for i, (t, f) in enumerate(zip(true_outputs, false_outputs)):
        if t.shape != f.shape or t.dtype != f.dtype:
            raise LoopLoweringError(
                f"{name}: output {i} differs between the branches: true_fn returns {describe_value(t)}, "
                f"false_fn {describe_value(f)}"
            )
