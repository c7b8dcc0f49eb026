"""Lowering rule: `torch.ops.higher_order.while_loop` -> one XLA `While`.

The While's state is (carries, additional inputs, hoisted tensors of cond, hoisted tensors
of body). cond and body become XLA computations called from the While's condition and body;
the body passes additional inputs and hoisted tensors through unchanged. If the body draws
random numbers, torch_xla's RNG seed is one more state element, advanced every iteration
so each iteration draws fresh numbers.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch_xla
import torch_xla.core.xla_builder as xb

from ..errors import LoopLoweringError, describe_value, loop_name
from .. import metrics
from .subgraph import INT_DTYPE, StagedComputation, SubgraphInterpreter, scalar_to_tensor, stage_computation

# torch_xla's own seed recurrence (XLAGraphExecutor::GetRngSeed), applied once per iteration.
_SEED_MUL = 214013
_SEED_ADD = 2531011


def lower_while_loop(
    node: torch.fx.Node | None,
    cond_gm: torch.fx.GraphModule,
    body_gm: torch.fx.GraphModule,
    carried_inputs: Sequence[Any],
    additional_inputs: Sequence[Any],
) -> tuple[Any, ...]:
    """Run a while_loop as one XLA While on lazy XLA tensors.

    Python int carries travel as 0-dim int64 tensors and come back as such; the caller
    (graph rewrite) turns results the graph expects as ints back into ints.
    """
    name = loop_name("while_loop", node)
    metrics.increment(metrics.LOOPS_LOWERED)
    carries = [_carry_to_tensor(name, i, c) for i, c in enumerate(carried_inputs)]
    extras = [_carry_to_tensor(name, i, a, what="additional input") for i, a in enumerate(additional_inputs)]
    num_carries = len(carries)

    def run_cond(args: list[torch.Tensor]) -> list[torch.Tensor]:
        pred = SubgraphInterpreter(cond_gm, name).run(*args)
        return [_check_predicate(name, pred)]

    def run_body(args: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = SubgraphInterpreter(body_gm, name).run(*args)
        return _check_body_outputs(name, outputs, carries)

    inputs = carries + extras
    cond = stage_computation("while_cond", run_cond, inputs)
    body = stage_computation("while_body", run_body, inputs)
    return tuple(_build_while(cond, body, inputs, num_carries))


def _build_while(
    cond: StagedComputation, body: StagedComputation, inputs: list[torch.Tensor], num_carries: int
) -> list[torch.Tensor]:
    state = list(inputs)
    # The loop state index of each computation parameter.
    cond_map = _place_params(cond, state)
    body_map = _place_params(body, state)
    seed_index = None
    for staged, mapping in ((body, body_map), (cond, cond_map)):
        if staged.seed_param is not None:
            seed_index = mapping[staged.seed_param]
    if seed_index is not None:
        # Start from a number drawn in the enclosing graph, so the loop's stream differs from
        # the random ops around it; the bridge reseeds that draw on every call.
        state[seed_index] = torch.randint(0, 2**62, (), dtype=torch.int64, device=torch_xla.device())

    builder = xb.create_builder("while_loop")
    params = [xb.mkparam(builder, i, xb.tensor_shape(t)) for i, t in enumerate(state)]

    def call(staged: StagedComputation, mapping: list[int], values: Sequence[xb.Op]) -> xb.Op:
        return xb.Op.call(staged.computation, [values[mapping[k]] for k in range(len(mapping))])

    def cond_fn(*values: xb.Op) -> xb.Op:
        return call(cond, cond_map, values).get_tuple_element(0)

    def body_fn(*values: xb.Op) -> tuple[xb.Op, ...]:
        result = call(body, body_map, values)
        new = list(values)
        for i in range(num_carries):
            new[i] = result.get_tuple_element(i)
        if seed_index is not None:
            seed = values[seed_index]
            new[seed_index] = seed * xb.Op.scalar(seed.builder(), _SEED_MUL, dtype=xb.Type.S64) + xb.Op.scalar(
                seed.builder(), _SEED_ADD, dtype=xb.Type.S64
            )
        return tuple(new)

    loop = xb.Op.mkwhile(params, cond_fn, body_fn)
    computation = loop.build("xla_loop_while")
    outputs = torch_xla._XLAC._xla_user_computation("xla_loop::while_loop", state, computation)
    return list(outputs[:num_carries])


def _place_params(staged: StagedComputation, state: list[torch.Tensor]) -> list[int]:
    """Map each parameter of `staged` to a loop-state index, appending hoisted tensors."""
    mapping = []
    for kind, source in staged.param_sources:
        if kind == "input":
            mapping.append(source)
        else:
            mapping.append(len(state))
            state.append(source)
    return mapping


def _carry_to_tensor(loop: str, index: int, value: Any, what: str = "carry") -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.device.type != "xla":
            value = value.to(torch_xla.device())
        return value
    if isinstance(value, (bool, int)):
        return scalar_to_tensor(value, torch.bool if isinstance(value, bool) else INT_DTYPE)
    raise LoopLoweringError(
        f"{loop}: {what} {index} must be a tensor or a Python int, found {describe_value(value)} ({value!r})"
    )


def _check_predicate(loop: str, pred: Any) -> torch.Tensor:
    if isinstance(pred, bool):
        return scalar_to_tensor(pred, torch.bool)
    if not isinstance(pred, torch.Tensor) or pred.dim() != 0 or pred.dtype != torch.bool:
        raise LoopLoweringError(
            f"{loop}: cond must return a scalar bool tensor (bool[]), found {describe_value(pred)}"
        )
    return pred


def _check_body_outputs(loop: str, outputs: Any, carries: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    if len(outputs) != len(carries):
        raise LoopLoweringError(
            f"{loop}: body must return {len(carries)} carries (as many as it takes), found {len(outputs)}"
        )
    checked = []
    for i, (out, carry) in enumerate(zip(outputs, carries)):
        if not isinstance(out, torch.Tensor):
            out = scalar_to_tensor(out, carry.dtype)
        if out.shape != carry.shape or out.dtype != carry.dtype:
            raise LoopLoweringError(
                f"{loop}: body changes carry {i}: expected {describe_value(carry)} "
                f"(as passed in), found {describe_value(out)}"
            )
        checked.append(out)
    return checked
