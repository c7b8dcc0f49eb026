"""The operands of one XLA While or Conditional, shared by the lowering rules.

An XLA While threads one tuple of values through its condition and body; a Conditional
passes one tuple to the branch it takes. Each rule puts its own tensors in it (carries,
stacked outputs, inputs to slice, a cond's operands), then attaches staged computations:
the device data a computation captured ("hoisted" tensors) becomes more state, passed
through unchanged. If a computation draws random numbers, torch_xla's RNG seed is one more
element, drawn afresh in the enclosing graph on every call; a While advances it every
iteration, so each iteration draws fresh numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch_xla
import torch_xla.core.xla_builder as xb

from ..errors import LoopLoweringError, describe_value
from .sharding import gathered_invariants
from .subgraph import INT_DTYPE, StagedComputation, scalar_to_tensor

# torch_xla's own seed recurrence (XLAGraphExecutor::GetRngSeed), applied once per iteration.
_SEED_MUL = 214013
_SEED_ADD = 2531011


@dataclass
class AttachedComputation:
    """A staged computation whose hoisted parameters live at known state indices."""

    staged: StagedComputation
    hoisted_index: dict[int, int]

    def call(self, state: Sequence[xb.Op], inputs: Sequence[xb.Op]) -> xb.Op:
        """Call it inside the While: parameter k is `inputs[i]` for ("input", i), else state."""
        args = [
            inputs[source] if kind == "input" else state[self.hoisted_index[k]]
            for k, (kind, source) in enumerate(self.staged.param_sources)
        ]
        return xb.Op.call(self.staged.computation, args)


class ControlFlowState:
    """Builds the operand tuple of one While or Conditional, and the op itself."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.seed_index: int | None = None
        self.invariants: list[int] = []  # what every iteration reads unchanged (captured tensors)

    def add(self, tensors: Sequence[torch.Tensor], invariant: bool = False) -> list[int]:
        start = len(self.tensors)
        self.tensors.extend(tensors)
        added = list(range(start, len(self.tensors)))
        if invariant:
            self.invariants.extend(added)
        return added

    def attach(self, staged: StagedComputation) -> AttachedComputation:
        hoisted_index = {}
        for k, (kind, source) in enumerate(staged.param_sources):
            if kind != "hoisted":
                continue
            if k in staged.seed_params:
                if self.seed_index is None:
                    self.seed_index = self.add([source])[0]
                hoisted_index[k] = self.seed_index
            else:
                hoisted_index[k] = self.add([source], invariant=True)[0]
        return AttachedComputation(staged, hoisted_index)

    def build(
        self,
        name: str,
        cond_fn: Callable[[list[xb.Op]], xb.Op],
        body_fn: Callable[[list[xb.Op]], list[xb.Op]],
    ) -> list[torch.Tensor]:
        """Run the While as one user computation on the lazy tensors; returns the final state.

        `body_fn` returns the whole next state; the seed (if any) is advanced here.
        """
        state = self._operands()
        builder = xb.create_builder(name)
        params = [xb.mkparam(builder, i, xb.tensor_shape(t)) for i, t in enumerate(state)]
        seed_index = self.seed_index

        def body(*values: xb.Op) -> tuple[xb.Op, ...]:
            new = list(body_fn(list(values)))
            if seed_index is not None:
                seed = values[seed_index]
                mul = xb.Op.scalar(seed.builder(), _SEED_MUL, dtype=xb.Type.S64)
                add = xb.Op.scalar(seed.builder(), _SEED_ADD, dtype=xb.Type.S64)
                new[seed_index] = seed * mul + add
            return tuple(new)

        loop = xb.Op.mkwhile(params, lambda *values: cond_fn(list(values)), body)
        computation = loop.build(name)
        return list(torch_xla._XLAC._xla_user_computation(f"xla_loop::{name}", state, computation))

    def build_conditional(
        self,
        name: str,
        pred: torch.Tensor,
        true_fn: Callable[[list[xb.Op]], list[xb.Op]],
        false_fn: Callable[[list[xb.Op]], list[xb.Op]],
    ) -> list[torch.Tensor]:
        """Run a Conditional on `pred` (a bool[] tensor) as one user computation; each
        branch function maps the operand tuple to the outputs."""
        state = self._operands(loop=False)
        builder = xb.create_builder(name)
        pred_param = xb.mkparam(builder, 0, xb.tensor_shape(pred))
        params = [xb.mkparam(builder, i + 1, xb.tensor_shape(t)) for i, t in enumerate(state)]
        branches = [lambda *values, fn=fn: tuple(fn(list(values))) for fn in (true_fn, false_fn)]
        computation = pred_param.mkconditional(params, *branches).build(name)
        return list(torch_xla._XLAC._xla_user_computation(f"xla_loop::{name}", [pred, *state], computation))

    def _operands(self, loop: bool = True) -> list[torch.Tensor]:
        # (SPMD: a While's invariants gathered once before it; a Conditional runs once)
        state = gathered_invariants(self.tensors, self.invariants) if loop else list(self.tensors)
        if self.seed_index is not None:
            # Start from a number drawn in the enclosing graph, so the op's stream differs
            # from the random ops around it; the dynamo bridge reseeds that draw every call.
            state[self.seed_index] = torch.randint(0, 2**62, (), dtype=torch.int64, device=torch_xla.device())
        return state


def as_state_tensor(loop: str, index: int, value: Any, what: str = "carry") -> torch.Tensor:
    """A loop input as a lazy XLA tensor; Python ints/bools become 0-dim device tensors."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "xla":
            value = value.to(torch_xla.device())
        return value
    if isinstance(value, (bool, int)):
        return scalar_to_tensor(value, torch.bool if isinstance(value, bool) else INT_DTYPE)
    raise LoopLoweringError(
        f"{loop}: {what} {index} must be a tensor or a Python int, found {describe_value(value)} ({value!r})"
    )


def check_new_carries(loop: str, fn_name: str, outputs: Sequence[Any], carries: list[torch.Tensor]) -> list[torch.Tensor]:
    """The carries a body returns must match the ones it took, in number, shape and dtype."""
    if len(outputs) != len(carries):
        raise LoopLoweringError(
            f"{loop}: {fn_name} must return {len(carries)} carries (as many as it takes), found {len(outputs)}"
        )
    checked = []
    for i, (out, carry) in enumerate(zip(outputs, carries)):
        if not isinstance(out, torch.Tensor):
            out = scalar_to_tensor(out, carry.dtype)
        if out.shape != carry.shape or out.dtype != carry.dtype:
            raise LoopLoweringError(
                f"{loop}: {fn_name} changes carry {i}: expected {describe_value(carry)} "
                f"(as passed in), found {describe_value(out)}"
            )
        checked.append(out)
    return checked
